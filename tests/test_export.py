"""Exported backbones from someone else: they take images as users have them, and a crafted backbone.json can
neither reach timm with weight-loading options nor crash the loader."""

import json
import sys
import types

import pytest
import torch
from torch import nn

import selfsup
from selfsup.nn.backbones import ImageBackbone, build_backbone, export_backbone, load_backbone

MEAN, STD = [0.2860], [0.3530]  # Fashion-MNIST


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    model = build_backbone("resnet10", in_chans=1, stem="small", width=4)
    with torch.no_grad():  # BN statistics that are not the identity, so a missing normalization shows
        model.train()(torch.randn(16, 1, 12, 12) * 2 + 1)
    export_backbone(model.eval(), tmp_path / "exp", extra={"mean": MEAN, "std": STD})
    return model, tmp_path / "exp"


def test_loaded_backbone_takes_uint8_and_unit_floats_and_normalizes_itself(exported):
    model, path = exported
    images = torch.randint(0, 256, (5, 1, 12, 12), dtype=torch.uint8)
    with torch.no_grad():
        expected = model((images.float() / 255 - MEAN[0]) / STD[0])
        loaded = selfsup.load_backbone(path)
        assert isinstance(loaded, ImageBackbone) and not loaded.training and loaded.num_features == 32
        torch.testing.assert_close(loaded(images), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(images.float() / 255), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(images.double() / 255), expected, rtol=1e-5, atol=1e-5)
        # the bare network is still there for code that normalizes itself
        raw = selfsup.load_backbone(path, raw=True)
        torch.testing.assert_close(raw((images.float() / 255 - MEAN[0]) / STD[0]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, error, message", [
    (lambda x: (x.float() / 255 - MEAN[0]) / STD[0], ValueError, r"must lie in \[0, 1\].*raw=True"),
    (lambda x: x.float(), ValueError, r"must lie in \[0, 1\]"),  # 0..255 floats
    (lambda x: torch.full(x.shape, float("nan")), ValueError, r"must lie in \[0, 1\]"),
    (lambda x: x.long(), TypeError, "uint8"),
    (lambda x: x[0], ValueError, r"add a batch dimension"),
    (lambda x: x.expand(-1, 3, -1, -1), ValueError, r"\(B, 1, H, W\)"),
    (lambda x: x.permute(0, 2, 3, 1)[:, :, :, :1].expand(-1, 12, 12, 1), ValueError, "channels last"),
    (lambda x: x.numpy(), TypeError, "torch.from_numpy"),
])
def test_loaded_backbone_refuses_images_it_would_misread(exported, bad, error, message):
    loaded = selfsup.load_backbone(exported[1])
    with pytest.raises(error, match=message):
        loaded(bad(torch.randint(0, 256, (2, 1, 12, 12), dtype=torch.uint8)))


def test_export_without_normalization_needs_raw(tmp_path):
    export_backbone(build_backbone("resnet10", in_chans=1, width=4), tmp_path)
    with pytest.raises(ValueError, match=r"records no input normalization.*raw=True"):
        selfsup.load_backbone(tmp_path)
    assert selfsup.load_backbone(tmp_path, raw=True).num_features == 32


def test_a_loaded_backbone_exports_again_with_its_normalization(exported, tmp_path):
    loaded = selfsup.load_backbone(exported[1])
    selfsup.export_backbone(loaded, tmp_path / "again")
    config = json.loads((tmp_path / "again" / "backbone.json").read_text())
    assert config["mean"] == pytest.approx(MEAN) and config["std"] == pytest.approx(STD)
    x = torch.randint(0, 256, (3, 1, 12, 12), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(selfsup.load_backbone(tmp_path / "again")(x), loaded(x))


# ------------------------------------------------------------------------------------------- crafted files


class _FakeTimm(types.ModuleType):
    """Stands in for timm and records every create_model call (timm itself is an optional extra)."""

    def __init__(self):
        super().__init__("timm")
        self.calls = []

    def create_model(self, model_name, num_classes=0, in_chans=3, **kwargs):
        self.calls.append((model_name, kwargs))
        net = nn.Sequential(nn.Conv2d(in_chans, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        net.num_features = 4
        return net


@pytest.fixture
def fake_timm(monkeypatch):
    fake = _FakeTimm()
    monkeypatch.setitem(sys.modules, "timm", fake)
    return fake


def _write_timm_export(path, spec_extra, fake):
    model = build_backbone("timm:resnet18", in_chans=1)
    export_backbone(model, path, extra={"mean": MEAN, "std": STD})
    config = json.loads((path / "backbone.json").read_text())
    config["spec"].update(spec_extra)
    (path / "backbone.json").write_text(json.dumps(config))
    fake.calls.clear()


@pytest.mark.parametrize("crafted", [
    {"pretrained": True},
    {"pretrained_cfg_overlay": {"url": "https://attacker.example/weights.pth"}},
    {"checkpoint_path": "/tmp/payload.pth"},
    {"pretrained": True, "drop_rate": 0.1},
])
def test_crafted_timm_options_never_reach_timm(tmp_path, fake_timm, crafted):
    _write_timm_export(tmp_path, crafted, fake_timm)
    with pytest.raises(ValueError, match=r"refused backbone options .*weights come only from"):
        load_backbone(tmp_path)
    assert fake_timm.calls == []  # refused before timm.create_model is called


def test_architecture_options_do_reach_timm(tmp_path, fake_timm):
    _write_timm_export(tmp_path, {"drop_path_rate": 0.1, "global_pool": "avg"}, fake_timm)
    loaded = load_backbone(tmp_path)
    assert fake_timm.calls == [("resnet18", {"drop_path_rate": 0.1, "global_pool": "avg"})]
    assert loaded(torch.zeros(2, 1, 8, 8, dtype=torch.uint8)).shape == (2, 4)


def test_exporting_a_timm_model_built_with_pretrained_weights_keeps_them_out_of_the_spec(tmp_path, fake_timm):
    export_backbone(build_backbone("timm:resnet18", in_chans=1, pretrained=True, drop_rate=0.2), tmp_path)
    spec = json.loads((tmp_path / "backbone.json").read_text())["spec"]
    assert spec == {"name": "timm:resnet18", "in_chans": 1, "drop_rate": 0.2}


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"spec": ' + "[" * 50_000 + "]" * 50_000 + ', "format_version": 1}', "nested too deeply"),
    ("[1, 2]", "expected an object"),
    ('{"spec": "resnet10", "format_version": 1}', "expected an object"),
    ('{"spec": {"name": "resnet10", "in_chans": "1"}, "format_version": 1}', "in_chans must be an integer"),
    ('{"spec": {"name": "resnet10", "in_chans": 1, "width": {"a": [[1]]}}, "format_version": 1}',
     "must be numbers"),
    ('{"spec": {"name": "resnet10", "in_chans": 1, "width": "4"}, "format_version": 1, "mean": [0.5], '
     '"std": [1]}', "does not build"),
    ('{"spec": {"name": "resnet10", "in_chans": 1, "eval": "x"}, "format_version": 1}', "refused backbone options"),
    ('{"spec": {"name": "timm:../../etc/passwd", "in_chans": 1}, "format_version": 1}', "not a timm model name"),
    ('{"spec": {"name": "resnet10", "in_chans": 1, "width": 4}, "format_version": 1, "mean": [0.5], "std": [0]}',
     "std > 0"),
    ('{"spec": {"name": "resnet10", "in_chans": 1, "width": 4}, "format_version": 1, "mean": [0.5, 1], '
     '"std": [1, 1]}', "lists of 1 finite numbers"),
])
def test_malformed_backbone_json_gives_a_clear_error(tmp_path, text, message):
    export_backbone(build_backbone("resnet10", in_chans=1, width=4), tmp_path, extra={"mean": MEAN, "std": STD})
    (tmp_path / "backbone.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_backbone(tmp_path)


def test_an_oversized_backbone_json_is_not_parsed(tmp_path):
    export_backbone(build_backbone("resnet10", in_chans=1, width=4), tmp_path, extra={"mean": MEAN, "std": STD})
    (tmp_path / "backbone.json").write_text('{"pad": "' + "x" * (2 << 20) + '"}')
    with pytest.raises(ValueError, match="not a backbone config"):
        load_backbone(tmp_path)


def test_every_selfsup_name_in_messages_docs_and_readme_exists():
    """Error messages and examples name `selfsup.x.y` things; each must exist (and be callable where called)."""
    import importlib
    import re
    from pathlib import Path

    root = Path(selfsup.__file__).parent
    texts = [p.read_text() for p in root.rglob("*.py")]
    readme = root.parents[1] / "README.md"
    if readme.is_file():
        texts.append(readme.read_text())
    texts += [p.read_text() for p in (root.parents[1] / "docs").rglob("*.md")]  # the docs pages, in a checkout
    names = {(m.group(1), m.group(2) == "(") for t in texts for m in re.finditer(r"\bselfsup((?:\.\w+)+)(\(?)", t)}
    assert len(names) > 20
    for dotted, called in sorted(names):
        parts = dotted.strip(".").split(".")
        obj, i = selfsup, 0
        while i < len(parts):
            if hasattr(obj, parts[i]):
                obj = getattr(obj, parts[i])
            else:
                try:
                    obj = importlib.import_module("selfsup." + ".".join(parts[: i + 1]))
                except ImportError:
                    pytest.fail(f"selfsup{dotted} is named in the code or README but does not exist")
            i += 1
        if called:
            assert callable(obj), f"selfsup{dotted}(...) is shown as a call but is a {type(obj).__name__}"
