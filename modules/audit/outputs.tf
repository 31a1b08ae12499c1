output "trail_arn" {
  description = "ARN of the CloudTrail trail."
  value       = aws_cloudtrail.main.arn
}

output "bucket" {
  description = "The bucket holding the trail's logs."
  value       = aws_s3_bucket.trail.id
}
