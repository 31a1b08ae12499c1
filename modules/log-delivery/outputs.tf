output "log_group_arn" {
  description = "ARN of the log group."
  value       = aws_cloudwatch_log_group.this.arn
}

output "role_arn" {
  description = "ARN of the delivery role, for the service's iam_role_arn; known once it may write."
  value       = aws_iam_role.delivery.arn
  # The service checks the role when it is handed over: only once its policy is in place.
  depends_on = [aws_iam_role_policy.delivery]
}
