"""Architecture search: SPOS (supernet + evolution); DARTS and ProxylessNAS to come."""
