"""sirf_ddip.backends"""
