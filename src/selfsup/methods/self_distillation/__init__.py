"""Self-distillation (cookbook §2.3): BYOL, DINO, MeanShift; the catalog adds SimSiam, iBOT, MSN."""
