"""sirf_ddip.utils"""
