output "bucket" {
  description = "Name of the access-log bucket, for aws_s3_bucket_logging.target_bucket; known once its policy lets S3 deliver into it."
  value       = aws_s3_bucket.logs.id
  # S3 refuses logging into a bucket that does not yet let the logging service write.
  depends_on = [aws_s3_bucket_policy.logs]
}
