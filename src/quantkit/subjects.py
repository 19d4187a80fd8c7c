"""What C-Eval, CMMLU and BOSS contain: subjects with their categories, BOSS datasets and labels.

Pure data plus :func:`select`, which turns the ``eval.<benchmark>.subjects`` entries (subject
names, category names, or nothing for all) into the list of subjects to evaluate.

- C-Eval (Huang et al. 2023, https://cevalbenchmark.com): 52 subjects in four categories; the
  Hugging Face dataset ``ceval/ceval-exam`` has one config per subject.
- CMMLU (Li et al. 2023, https://github.com/haonan-li/CMMLU): 67 subjects in five categories;
  the Hugging Face dataset ``haonan-li/cmmlu`` has one config per subject.
- BOSS (Yuan et al., NeurIPS 2023, https://github.com/lifan-yuan/OOD_NLP): five tasks, each with
  one in-distribution (ID) dataset and three out-of-distribution ones. The three classification
  tasks are scored here; named-entity recognition and extractive QA are generation tasks with
  span F1 and are not part of the multiple-choice protocol.
"""

from __future__ import annotations

from collections.abc import Iterable

_STEM, _SOC, _HUM, _OTHER, _CHINA = "STEM", "Social Science", "Humanities", "Other", "China specific"

CEVAL_SUBJECTS: dict[str, str] = {
    **dict.fromkeys((
        "computer_network", "operating_system", "computer_architecture", "college_programming",
        "college_physics", "college_chemistry", "advanced_mathematics", "probability_and_statistics",
        "discrete_mathematics", "electrical_engineer", "metrology_engineer", "high_school_mathematics",
        "high_school_physics", "high_school_chemistry", "high_school_biology", "middle_school_mathematics",
        "middle_school_biology", "middle_school_physics", "middle_school_chemistry", "veterinary_medicine"), _STEM),
    **dict.fromkeys((
        "college_economics", "business_administration", "marxism", "mao_zedong_thought", "education_science",
        "teacher_qualification", "high_school_politics", "high_school_geography", "middle_school_politics",
        "middle_school_geography"), _SOC),
    **dict.fromkeys((
        "modern_chinese_history", "ideological_and_moral_cultivation", "logic", "law",
        "chinese_language_and_literature", "art_studies", "professional_tour_guide", "legal_professional",
        "high_school_chinese", "high_school_history", "middle_school_history"), _HUM),
    **dict.fromkeys((
        "civil_servant", "sports_science", "plant_protection", "basic_medicine", "clinical_medicine",
        "urban_and_rural_planner", "accountant", "fire_engineer", "environmental_impact_assessment_engineer",
        "tax_accountant", "physician"), _OTHER),
}

CMMLU_SUBJECTS: dict[str, str] = {
    **dict.fromkeys((
        "anatomy", "astronomy", "college_actuarial_science", "college_engineering_hydrology", "college_mathematics",
        "college_medical_statistics", "computer_science", "conceptual_physics", "electrical_engineering",
        "elementary_mathematics", "genetics", "high_school_biology", "high_school_chemistry",
        "high_school_mathematics", "high_school_physics", "machine_learning", "virology"), _STEM),
    **dict.fromkeys((
        "arts", "college_law", "global_facts", "international_law", "jurisprudence", "logical", "marxist_theory",
        "philosophy", "professional_law", "world_history", "world_religions"), _HUM),
    **dict.fromkeys((
        "business_ethics", "college_education", "economics", "education", "high_school_geography", "journalism",
        "management", "marketing", "professional_accounting", "professional_psychology", "public_relations",
        "security_study", "sociology"), _SOC),
    **dict.fromkeys((
        "agronomy", "clinical_knowledge", "college_medicine", "computer_security",
        "elementary_information_and_technology", "food_science", "human_sexuality", "legal_and_moral_basis",
        "nutrition", "professional_medicine", "sports_science"), _OTHER),
    **dict.fromkeys((
        "ancient_chinese", "chinese_civil_service_exam", "chinese_driving_rule", "chinese_food_culture",
        "chinese_foreign_policy", "chinese_history", "chinese_literature", "chinese_teacher_qualification",
        "construction_project_management", "elementary_chinese", "elementary_commonsense", "ethnology",
        "high_school_politics", "modern_chinese", "traditional_chinese_medicine"), _CHINA),
}

# BOSS classification datasets -> their task (the folder names of the authors' archive).
BOSS_DATASETS: dict[str, str] = {
    **dict.fromkeys(("amazon", "dynasent", "semeval", "sst5"), "SentimentAnalysis"),
    **dict.fromkeys(("civil_comments", "adv_civil", "implicit_hate", "toxigen"), "ToxicDetection"),
    **dict.fromkeys(("mnli", "anli", "contract_nli", "wanli"), "NaturalLanguageInference"),
}
# The in-distribution dataset of each task: its train split gives the few-shot examples and the
# calibration text (BOSS's out-of-distribution datasets are test sets).
BOSS_ID_DATASET: dict[str, str] = {
    "SentimentAnalysis": "amazon", "ToxicDetection": "civil_comments", "NaturalLanguageInference": "mnli",
}
# Label words by label id, as the BOSS prompts name the options.
BOSS_LABELS: dict[str, tuple[str, ...]] = {
    "SentimentAnalysis": ("negative", "positive", "neutral"),
    "ToxicDetection": ("benign", "toxic"),
    "NaturalLanguageInference": ("entailment", "neutral", "contradiction"),
}

TABLES: dict[str, dict[str, str]] = {"ceval": CEVAL_SUBJECTS, "cmmlu": CMMLU_SUBJECTS, "boss": BOSS_DATASETS}
"""Per benchmark: subject (BOSS: dataset) -> category (BOSS: task)."""


def select(benchmark: str, entries: Iterable[str], key: str) -> list[str]:
    """The subjects of ``benchmark`` named by ``entries`` (subjects or categories; empty: all),
    in table order; an unknown entry is a ValueError naming ``key`` (no quantkit import here:
    the config checks these names through this function)."""
    table = TABLES[benchmark]
    entries = list(entries)
    if not entries:
        return list(table)
    categories = sorted(set(table.values()))
    chosen: set[str] = set()
    for entry in entries:
        if entry in table:
            chosen.add(entry)
        elif entry in categories:
            chosen.update(s for s, c in table.items() if c == entry)
        else:
            raise ValueError(
                f"{key} entry {entry!r} is neither a {benchmark} subject nor a category; categories: "
                f"{', '.join(categories)}; subjects: {', '.join(table)}")
    return [s for s in table if s in chosen]
