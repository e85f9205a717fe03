-- MLflow's basic-auth app keeps its users and permissions in a database of its own
-- (services/mlflow/basic_auth.ini); the postgres image runs this once, on an empty volume.
CREATE DATABASE mlflow_auth OWNER mlflow;
