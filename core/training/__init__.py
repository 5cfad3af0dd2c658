"""Learning from the job: dialogue data, fine-tuning, evaluation (`chatbot train`, `eval`)."""
