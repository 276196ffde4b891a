"""The test suite, grouped like the code: models/, methods/ (distiller_zoo and crd), data/ (dataset),
engine/ (the run machinery and common/), scripts/ (the top scripts, scripts/, docs), e2e/ (training
scripts run end to end). Support modules (tolerance, datagen, drivers) and fixtures/ stay here."""
