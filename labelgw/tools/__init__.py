"""Tools around labelgw: the test and demo backend (whoami) and the balancing simulator."""
