# The MLflow tracking server with the PostgreSQL driver (the plain postgresql:// URL is psycopg 3).
# Pin MLflow to the version the project runs (see .venv/bin/pip show mlflow).
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow==3.17.2" "psycopg[binary]>=3.1" \
    && useradd --create-home --uid 1000 mlflow && mkdir /mlartifacts && chown mlflow /mlartifacts
USER mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host=0.0.0.0", "--port=5000", "--serve-artifacts", "--artifacts-destination=/mlartifacts"]
