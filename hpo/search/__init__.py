"""Running a search: the search run (`run`), THE trial function both backends call (`trial`),
where trials run (`devices`), Ctrl-C between store writes (`interrupts`), what a search reports
as it goes (`events`), and the backends (`backends/optuna`, `backends/ray`), each imported only
when a study chooses it. Depends on hpo.config and hpo.tracking; nothing of after/ or cli/."""

from imgcls.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("SearchResult", "pareto_front", "prepare_search", "run_search"),
                    "hpo.search.run"),
    **dict.fromkeys(("TrialRunner", "run_trial"), "hpo.search.trial"),
    "StudyContext": "hpo.search.context",
    **dict.fromkeys(("NullObserver", "SearchObserver"), "hpo.search.events"),
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
