"""Tools for looking inside: traces, interventions, scoring, plots."""
