output "bucket" {
  description = "The state bucket, for terraform.backend.s3.bucket in karrots.yaml."
  value       = aws_s3_bucket.state.id
}

output "lock_table" {
  description = "The lock table, for terraform.backend.s3.dynamodb_table in karrots.yaml."
  value       = aws_dynamodb_table.lock.name
}
