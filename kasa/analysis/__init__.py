"""Analysis of finished runs from their saved files: sweep summaries (sweep), the paper-style comparison tables
(compare) and figures (plots). Scoring during training and kasa-eval lives in kasa.evaluation."""
