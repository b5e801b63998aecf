"""Structure–property libraries: many images in one :class:`xarray.DataTree`.

Layout (schema ``atomds-library-v1``)::

    /                 coordinate image(image) = the image ids; status(image) "ok"/"failed",
                      error(image) (empty when ok); per-image properties (composition, temperature,
                      ...) along image; after library-wide learning the per-image summaries
                      cluster_fraction(image, cluster_id) and mean_loading(image, component)
    /atoms            every atom of every image on one `atom` dim (CF contiguous ragged array):
                      atom_count(image) (attribute sample_dimension = "atom"), image_index(atom),
                      the per-atom variables shared by all images, and the library-wide learning
                      results (cluster, pca_loadings, pca_components, ...)
    /images/<id>      everything else of each image on its own grid; its ``image(y, x)`` is stored
                      as ``pixels(y, x)`` (the root's ``image`` coordinate is inherited by every
                      node, so a variable may not share its name)

:func:`from_datasets` builds a library from image Datasets and :func:`image` gives one back
exactly; :func:`to_netcdf` / :func:`open_library` write and read it (atomic write, exact round
trip); :func:`to_zarr` writes a Zarr store (any fsspec URL) that :func:`open_library` opens
lazily and :func:`append` grows without rewriting the images already in it. :func:`learn` (or :func:`suggest_k`, :func:`kmeans`, :func:`pca`) fits k-means and PCA on
the neighbourhoods of all atoms together, so labels and modes mean the same in every image, and
adds per-image summaries ready to correlate with the properties (:func:`property_correlation`).

Modules: :mod:`~atomds.library.layout` (constants, ids, views), :mod:`~atomds.library.properties`,
:mod:`~atomds.library.build` (:func:`from_datasets`), :mod:`~atomds.library.store` (files and
validation), :mod:`~atomds.library.learning` and :mod:`~atomds.library.spectra`.
"""

from __future__ import annotations

from .build import from_datasets
from .layout import (
    LEARNED_DIMS,
    LEARNED_VARS,
    LIBRARY_SCHEMA,
    PIXELS,
    atom_offsets,
    atoms,
    atoms_node,
    distinct_ids,
    ids,
    image,
    make_ids,
)
from .learning import descriptor, kmeans, learn, linkage, pca, property_correlation, suggest_k, summarize
from .properties import read_properties, set_properties
from .spectra import attach_spectra
from .store import open_library, problems, to_netcdf, validate
from .zarrstore import append, to_zarr

__all__ = [
    "from_datasets",
    "image",
    "ids",
    "atoms",
    "atoms_node",
    "atom_offsets",
    "make_ids",
    "distinct_ids",
    "read_properties",
    "set_properties",
    "to_netcdf",
    "to_zarr",
    "append",
    "open_library",
    "validate",
    "problems",
    "learn",
    "descriptor",
    "linkage",
    "suggest_k",
    "kmeans",
    "pca",
    "summarize",
    "property_correlation",
    "attach_spectra",
    "LIBRARY_SCHEMA",
    "LEARNED_VARS",
    "LEARNED_DIMS",
    "PIXELS",
]
