"""Out-of-core and streaming machinery: one region engine (design §7)."""
