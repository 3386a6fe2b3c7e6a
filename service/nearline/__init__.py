"""Results computed beside requests and kept in Redis for every gateway replica to use."""
