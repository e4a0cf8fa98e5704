"""The honest baseline a classifier stage is compared with: TF-IDF over word 1-2 grams + logistic regression, with C
picked by 5-fold cross-validation on the training labels alone (the vectorizer is fitted inside each fold)."""

import time

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline

C_GRID = np.logspace(-2, 3, 11)


def _clean(text: str) -> str:
    return text.replace("<br />", " ").lower()  # IMDb keeps its HTML line breaks


def tfidf_logreg(train: tuple[list[str], list], test: tuple[list[str], list], seed: int) -> dict:
    """Fits on `train` (texts, labels), scores on `test`; returns the test accuracy, the chosen C and the time."""
    started = time.time()
    (train_texts, train_labels), (test_texts, test_labels) = train, test
    folds = min(5, min(train_labels.count(label) for label in set(train_labels)))
    if folds < 2:
        raise ValueError("Cross-validating C needs at least 2 training documents of every class.")
    pipeline = Pipeline([
        ("tfidf", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, preprocessor=_clean)),
        ("logreg", LogisticRegression(max_iter=5000)),
    ])
    search = GridSearchCV(pipeline, {"logreg__C": C_GRID}, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    search.fit(train_texts, train_labels)
    return {
        "test_accuracy": float(search.score(test_texts, test_labels)),
        "best_C": float(search.best_params_["logreg__C"]),
        "cv_accuracy": float(search.best_score_),
        "cv_folds": folds,
        "features": len(search.best_estimator_.named_steps["tfidf"].vocabulary_),
        "seconds": time.time() - started,
    }
