"""The client's model container (``ScaleoutModel``) to and from the CNN's parameter list.

The container (``scaleoututil.utils.model``, the same on 1.0.7 and 1.1) is a zip holding
``metadata.json`` and the helper's bytes as ``training_model.bin``. The stock
``from_training_model`` has the numpyhelper write an npz and then deflates that member again, a
second pass over compressed bytes; ``ScaleoutModel.from_stream`` takes a finished container as it
is, so the update is compressed once. Both lines read an unstamped ``metadata.json`` as their
current format, and the client re-stamps the update when it sets the update's id.
"""

from __future__ import annotations

import io
import json
import uuid
import zipfile

import numpy as np
from scaleout import ScaleoutModel

from . import model

HELPER = "numpyhelper"
CONTAINER_METADATA = "metadata.json"
CONTAINER_TRAINING_MODEL = "training_model.bin"


def params_from(scaleout_model: ScaleoutModel) -> list[np.ndarray]:
    """The CNN's parameter list from a ScaleoutModel, checked (headers before data, then finiteness).

    Read with :func:`model.read_npz` rather than the stock numpyhelper, which allocates whatever
    array sizes the file declares before anything can check them.
    """
    source = f"model {scaleout_model.model_id}"
    try:
        with scaleout_model.get_training_model_stream() as stream:
            return model.read_npz(stream, source)
    except (KeyError, zipfile.BadZipFile, OSError) as error:
        raise model.ModelFileError(f"{source}: holds no readable parameter file ({error})") from None


def to_scaleout_model(params: list[np.ndarray]) -> ScaleoutModel:
    """The update as a ScaleoutModel (helper ``numpyhelper``, a fresh model id), compressed once."""
    container = io.BytesIO()
    with zipfile.ZipFile(container, "w") as archive:
        metadata = {"model_id": str(uuid.uuid4()), "helper_type": HELPER}
        archive.writestr(CONTAINER_METADATA, json.dumps(metadata), zipfile.ZIP_DEFLATED)
        archive.writestr(CONTAINER_TRAINING_MODEL, model.npz_bytes(params), zipfile.ZIP_STORED)
    container.seek(0)
    return ScaleoutModel.from_stream(container)
