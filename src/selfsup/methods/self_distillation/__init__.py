"""Self-distillation (cookbook §2.3): BYOL, DINO; the catalog adds SimSiam, iBOT, MSN."""
