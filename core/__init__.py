"""Platform-neutral core of the chatbot: conversations in Redis, the job queue, generation."""
