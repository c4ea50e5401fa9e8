"""Deep metric learning (cookbook §2.2): SimCLR, MoCo v2 and v3, NNCLR, DCL/DCLW, SupCon, NPID."""
