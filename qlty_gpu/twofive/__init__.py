"""2.5D quilt: channel spec, gather table, plans and the quilt class (see qlty_gpu.qlty2_5D)."""
