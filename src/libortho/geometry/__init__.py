"""Subspaces, projections and entanglement (eta) of weight updates."""

from libortho.geometry.subspace import energy_basis, eta, project_out, random_eta_baseline

__all__ = ["energy_basis", "eta", "project_out", "random_eta_baseline"]
