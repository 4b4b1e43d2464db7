"""Offline data tools of dopsd-scale (importable as `dopsd_data_tools`)."""
