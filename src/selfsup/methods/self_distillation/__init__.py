"""Self-distillation (cookbook §2.3): BYOL, DINO, SimSiam, DirectPred, MeanShift, DeepCluster-v2; the catalog adds
iBOT, MSN."""
