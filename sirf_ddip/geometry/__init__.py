"""sirf_ddip.geometry"""
