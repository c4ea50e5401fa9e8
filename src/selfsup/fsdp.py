"""``train.fsdp=true``: fully sharded data parallel (PyTorch's FSDP2, ``fully_shard``) for models too large to hold a
full copy of the weights, gradients and optimizer state on every device (cookbook §3.8.1; large ViTs).

Each process keeps 1/N of every parameter, gradient and optimizer state. A transformer block (and every other
network of the method: backbone, heads, predictor, EMA teacher) gathers its full weights just before it runs and
frees them after; gradients are reduce-scattered (averaged), so a step equals DDP's and 1 process's on the whole
batch (``tests/test_fsdp.py``). What needs the full tensors is gathered collectively: checkpoints (written by rank
0 in the same format as without FSDP, so a run can resume with or without it and on another number of processes),
the exported backbone, and the model rank 0 evaluates after training (an unsharded copy).

Element-wise optimizers only (AdamW, SGD): LARS scales each layer's step by ``||w|| / ||g||``, which a process
holding a shard would compute on its shard alone.
"""

from __future__ import annotations

import torch
from torch import nn

SHARDABLE_OPTIMIZERS = ("adamw", "sgd")
# what methods call on a network besides forward(): the ViT's named outputs (tokens, chosen blocks' outputs)
FORWARD_METHODS = ("forward_features",)


def check_fsdp(optimizer: str, world_size: int, device_type: str) -> None:
    """Refuse the combinations FSDP cannot run correctly, saying what to change."""
    if world_size < 2:
        raise ValueError("train.fsdp=true shards the model over several processes, and this run has one: launch it "
                         "with torchrun --nproc_per_node=N (or srun), or drop train.fsdp")
    if optimizer not in SHARDABLE_OPTIMIZERS:
        raise ValueError(f"train.fsdp=true needs an element-wise optimizer ({' or '.join(SHARDABLE_OPTIMIZERS)}); "
                         f"optim.name={optimizer} computes per-layer norms that a process holding a shard cannot. "
                         "Use optim.name=adamw (the ViT recipes' optimizer)")
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"train.fsdp=true runs on CUDA (NCCL) or CPU (gloo) processes, not {device_type}")


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks inside ``module`` (the members of a ``blocks`` ModuleList): the sharding unit."""
    return [b for name, child in module.named_modules() if name.split(".")[-1] == "blocks"
            and isinstance(child, nn.ModuleList) for b in child]


def shard(method: nn.Module, networks: dict[str, nn.Module]) -> list[str]:
    """``fully_shard`` every transformer block of ``networks``, then each network, then the method (the parameters
    left outside them). In place; returns the names of the sharded networks. Build the optimizer afterwards: the
    parameters become DTensors."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for module in networks.values():
        for block in _blocks(module):
            fully_shard(block)
        fully_shard(module)
        for name in FORWARD_METHODS:  # entry points other than forward() gather the weights too
            if callable(getattr(module, name, None)):
                register_fsdp_forward_method(module, name)
    fully_shard(method)
    return list(networks)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t`` (a DTensor's shard; a plain tensor as it is)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_states(method: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The full (unsharded) method and optimizer states on the CPU, as ``method.state_dict()`` and
    ``optimizer.state_dict()`` give them without FSDP (so the checkpoint format does not change). Collective: every
    process calls it; rank 0 gets the states, the others empty dicts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(method, optimizer, options=opts)
    return model_state, _as_param_ids(optim_state, method, optimizer)


def load_full_states(method: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                     optim_state: dict) -> None:
    """Load a checkpoint's full states (every process has read the file) into the sharded method and optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(method, optimizer, model_state_dict=model_state,
                   optim_state_dict=_as_param_names(optim_state, method, optimizer),
                   options=StateDictOptions(full_state_dict=True))


def _position_names(method: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter name at each position of ``optimizer.state_dict()`` (0, 1, ... over its groups, in order)."""
    name_of = {id(p): name for name, p in method.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _as_param_ids(optim_state: dict, method: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """torch.distributed.checkpoint keys the optimizer state by parameter name; ``optimizer.state_dict()`` (the
    checkpoint format) by the parameter's position over the optimizer's groups."""
    if not optim_state:
        return {}
    position = {name: i for i, name in enumerate(_position_names(method, optimizer))}
    return {"state": {position[name]: value for name, value in optim_state["state"].items()},
            "param_groups": [{**group, "params": [position[name] for name in group["params"]]}
                             for group in optim_state["param_groups"]]}


def _as_param_names(optim_state: dict, method: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The inverse of :func:`_as_param_ids` for an optimizer built as the one that wrote the state."""
    names = _position_names(method, optimizer)
    return {"state": {names[int(i)]: value for i, value in optim_state["state"].items()},
            "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                             for group in optim_state["param_groups"]]}
