"""Self-distillation (cookbook §2.3): BYOL, DINO, SimSiam, DirectPred, MeanShift; the catalog adds iBOT, MSN."""
