"""sirf_ddip.physics"""
