"""Architecture search stages on synthetic data: SPOS, DARTS and ProxylessNAS."""
