"""Self-distillation (cookbook §2.3): BYOL, DINO, SimSiam, DirectPred, MeanShift, MSN (with prior matching),
DeepCluster-v2; the catalog adds iBOT."""
