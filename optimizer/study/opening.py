"""Opening a study: create or load it, check its settings against the spec, keep the spec in it."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizer.errors import StorageError, StudyError
from optimizer.storage import DEFAULT_ROOT, JOURNAL_NAME, first_line, open_storage, safe_url, study_dir
from optimizer.study.spec import (
    FINGERPRINT_ATTR,
    SPEC_ATTR,
    SearchSpec,
    fingerprint_diff,
    spec_from_record,
    spec_record,
    variant_summary,
)
from optimizer.study.trials import METRIC_NAMES

if TYPE_CHECKING:  # pragma: no cover
    import optuna


def open_study(*, study_name: str, storage_url: str | None = None, root: Path = DEFAULT_ROOT, storage: Any = None,
               sampler: Any = None, create: bool = True) -> optuna.Study:
    """Create or load the study (three objectives, named metrics).

    ``storage``: an already opened storage (:func:`optimizer.storage.open_storage`); otherwise
    ``storage_url`` / ``root`` are opened here.

    Raises:
        StorageError: the storage cannot be opened, or a journal record is damaged.
        StudyError: ``create=False`` and there is no such study, or it exists with other directions.
    """
    import optuna

    if storage is None:
        storage = open_storage(study=study_name, url=storage_url, root=root)
    try:
        if not create:
            try:
                return optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
            except KeyError:
                raise StudyError(f"no study named {study_name!r} in this storage") from None
        study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, load_if_exists=True,
                                    directions=["minimize", "maximize", "maximize"])
    except json.JSONDecodeError as e:  # a journal line that is not JSON (edited or damaged file)
        raise StorageError(f"the study storage is damaged: a record is not valid JSON ({e}); restore it from a "
                           "backup or start a new --study") from None
    except ValueError as e:  # e.g. an existing study with other directions
        raise StudyError(f"cannot open study {study_name!r}: {first_line(e)}") from None
    if list(study.metric_names or []) != list(METRIC_NAMES):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(METRIC_NAMES))
    return study


def init_study(study: optuna.Study, spec: SearchSpec) -> None:
    """Check (or record) the settings of ``study`` and keep what other processes need to join it.

    Stores the fingerprint and protocols, the full spec (``exl2opt worker --study`` joins without
    ``--model``) and per-variant facts for reports, each only once.

    Raises:
        StudyError: the study was created with other settings.
    """
    fp = spec.fingerprint()
    old = study.user_attrs.get(FINGERPRINT_ATTR)
    if old is None:
        study.set_user_attr(FINGERPRINT_ATTR, fp)
        study.set_user_attr("budget_bytes", list(spec.budget.per_device))
        study.set_user_attr("split", spec.split.label)
        study.set_user_attr("eval_protocol", asdict(spec.eval_protocol))
        study.set_user_attr("speed_protocol", asdict(spec.speed_protocol))
    elif old != fp:
        raise StudyError(f"study {study.study_name!r} was created with other settings (changed: "
                         f"{fingerprint_diff(old=old, new=fp)}); rerun with the same options or a new --study name "
                         "(--n-trials, --timeout and --sampler may change)")
    if SPEC_ATTR not in study.user_attrs:
        study.set_user_attr(SPEC_ATTR, spec_record(spec))
    if "variants" not in study.user_attrs:
        study.set_user_attr("variants", {v.key: variant_summary(v) for v in spec.variants})


def load_spec(*, study_name: str, storage: Any, storage_url: str | None) -> SearchSpec:
    """The search spec stored by the worker or search that created the study.

    ``storage`` is the opened storage of ``storage_url`` (the URL only names it in messages).

    Raises:
        StudyError: no such study, it was created without a stored spec, or the stored spec is damaged.
    """
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise StudyError(f"no study named {study_name!r} in {safe_url(storage_url) if storage_url else 'the journal'}"
                         "; create it by giving exl2opt search or exl2opt worker the model options (--model, --vram)"
                         ) from None
    rec = study.user_attrs.get(SPEC_ATTR)
    if rec is None:
        raise StudyError(f"study {study_name!r} holds no search settings (it was made by an older exl2opt); "
                         "give the same --model, --vram and other options it was created with")
    return spec_from_record(rec, study_name=study_name)


def stored_spec(*, study_name: str, storage_url: str | None, root: Path = DEFAULT_ROOT) -> SearchSpec:
    """The spec kept in an existing study (a command given ``--study`` without the model options).

    Raises:
        StudyError: no such study (nothing is created), or it holds no usable spec.
        StorageError: the storage cannot be opened.
    """
    if storage_url is None and not (study_dir(study=study_name, root=root) / JOURNAL_NAME).is_file():
        raise StudyError(f"no study {study_name!r} under {root}; give --model and --vram to create it "
                         "(or --studies-dir / --storage where it lives)")
    storage = open_storage(study=study_name, url=storage_url, root=root)
    return load_spec(study_name=study_name, storage=storage, storage_url=storage_url)
