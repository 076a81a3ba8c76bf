"""A deploy gone wrong: importing the app fails (a typo, a missing setting).
gunicorn's arbiter has said READY=1 by the time its workers find out."""
raise RuntimeError("DATABASE_URL is not set")
