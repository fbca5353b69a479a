"""Geometry of weight updates: subspaces and eta, spectra and angles, linear mode connectivity."""

from libortho.geometry.lmc import LMCCurve, barrier, interpolate, lmc_curve
from libortho.geometry.spectra import (
    SpectralDensity,
    hvp,
    kfac_spectrum,
    lanczos,
    principal_angles,
    singular_values,
    slq_density,
)
from libortho.geometry.subspace import energy_basis, eta, eta_report, project_out, random_eta_baseline

__all__ = [
    "LMCCurve", "SpectralDensity", "barrier", "energy_basis", "eta", "eta_report", "hvp", "interpolate",
    "kfac_spectrum",
    "lanczos", "lmc_curve", "principal_angles", "project_out", "random_eta_baseline", "singular_values",
    "slq_density",
]
