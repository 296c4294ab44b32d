-- The official postgres image runs this once, on an empty data directory: MLflow's own database
-- beside the feedback store's (POSTGRES_DB=infantino), owned by the same user.
CREATE DATABASE mlflow OWNER infantino;
