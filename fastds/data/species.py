"""CF metadata of the MERRA-2 / G5NR aerosol extinction AODs (550 nm) fastds knows by name.

Any other variable is accepted too: it keeps its own units and long name, and gets no
``standard_name`` (a variable name is not a CF standard name).
"""
from __future__ import annotations

__all__ = ["SPECIES", "cf_attrs"]

# name: (long name as in the MERRA-2 files, CF standard name)
SPECIES = {
    "DUEXTTAU": ("Dust Extinction AOT [550 nm]",
                 "atmosphere_optical_thickness_due_to_dust_ambient_aerosol_particles"),
    "SSEXTTAU": ("Sea Salt Extinction AOT [550 nm]",
                 "atmosphere_optical_thickness_due_to_sea_salt_ambient_aerosol_particles"),
    "SUEXTTAU": ("SO4 Extinction AOT [550 nm]",
                 "atmosphere_optical_thickness_due_to_sulfate_ambient_aerosol_particles"),
    "BCEXTTAU": ("Black Carbon Extinction AOT [550 nm]",
                 "atmosphere_optical_thickness_due_to_black_carbon_ambient_aerosol_particles"),
    "OCEXTTAU": ("Organic Carbon Extinction AOT [550 nm]",
                 "atmosphere_optical_thickness_due_to_particulate_organic_matter_ambient_aerosol_particles"),
    "TOTEXTTAU": ("Total Aerosol Extinction AOT [550 nm]",
                  "atmosphere_optical_thickness_due_to_ambient_aerosol_particles"),
}


def cf_attrs(variable: str, *, units=None, long_name=None) -> dict:
    """``units``, ``long_name`` and, where CF has one, ``standard_name`` of ``variable``;
    the source's own units and long name win over the table's."""
    known_long, standard = SPECIES.get(variable, (None, None))
    attrs = {"units": str(units) if units else "1",
             "long_name": str(long_name) if long_name and long_name != variable else (known_long or variable)}
    if standard:
        attrs["standard_name"] = standard
    return attrs
