"""sirf_ddip.sim"""
