"""sirf_ddip.study"""
