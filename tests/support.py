"""Helpers shared by several test modules."""

from __future__ import annotations

import os

import numpy as np
import pytest

# What pip / urllib print when there is no network: installs that fail this way skip instead of failing.
NETWORK_ISH = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
               "Max retries exceeded", "ConnectTimeout", "Failed to establish a new connection")


def skip_if_offline(output: str, what: str) -> None:
    """pytest.skip("<what> (no network?): ...") when ``output`` shows that the network was unreachable."""
    if any(s in output for s in NETWORK_ISH):
        pytest.skip(f"{what} (no network?): {output[-600:]}")


def rel_err(got, want) -> float:
    """Max error relative to the largest reference value (float32 rounding shows as ~1e-7)."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def write_dicom_series(folder, volume, spacing=(0.9, 0.9, 2.5), origin=(0.0, 0.0, 0.0)) -> None:
    """An axial CT series of ``volume`` (x, y, z) in HU: one uncompressed file per slice, written with pydicom,
    voxel (0, 0, k) at ``origin`` + (0, 0, k * spacing[2]) mm."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    os.makedirs(folder, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(volume.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.Modality = "anonymous", "anonymous", "CT"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.PixelSpacing, ds.SliceThickness = [spacing[1], spacing[0]], spacing[2]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing[2]]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T.astype(np.int16)).tobytes()  # rows run along y
        ds.save_as(os.path.join(folder, f"slice{k:03d}.dcm"), enforce_file_format=True)
