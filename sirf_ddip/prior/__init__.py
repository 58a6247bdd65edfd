"""sirf_ddip.prior"""
