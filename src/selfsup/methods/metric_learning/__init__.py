"""Deep metric learning (cookbook §2.2): SimCLR; the catalog adds MoCo, NNCLR, DCL."""
