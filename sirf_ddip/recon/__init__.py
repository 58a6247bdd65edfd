"""sirf_ddip.recon"""
