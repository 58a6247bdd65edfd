"""sirf_ddip.io"""
