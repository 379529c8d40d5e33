"""Data in and data out: Samples, fastMRI/BART/NIfTI readers, the writer, and the site simulator.

``k-space → Sample`` is the entry of the reconstruction pipeline (DESIGN.md): every reader
validates its input (``recon.errors.InputError`` naming file and key), applies the sampling mask
and normalises intensities with :func:`normalization_scale`; :meth:`Sample.denormalize` and
:func:`write_reconstructions` bring results back to the file's raw scale and format.
"""

from recon.data.bart import bart_kspace_to_slices, read_cfl, slices_to_bart_kspace, write_cfl
from recon.data.fastmri_io import (
    FastMRISliceDataset,
    VolumeInfo,
    ismrmrd_header,
    read_volume_info,
    slice_mask_seed,
    write_kspace_volume,
    write_reconstructions,
)
from recon.data.nifti import NiftiVolume, read_nifti_magnitude
from recon.data.normalize import normalization_scale
from recon.data.sample import Sample, infer_mask, sample_from_kspace
from recon.data.sites import (
    SiteConfig,
    available_sites,
    load_site,
    simulate_site,
    site_dataset,
    training_images,
)

__all__ = [
    "Sample",
    "sample_from_kspace",
    "infer_mask",
    "normalization_scale",
    "FastMRISliceDataset",
    "VolumeInfo",
    "read_volume_info",
    "slice_mask_seed",
    "ismrmrd_header",
    "write_kspace_volume",
    "write_reconstructions",
    "read_cfl",
    "write_cfl",
    "bart_kspace_to_slices",
    "slices_to_bart_kspace",
    "NiftiVolume",
    "read_nifti_magnitude",
    "SiteConfig",
    "available_sites",
    "load_site",
    "simulate_site",
    "site_dataset",
    "training_images",
]
