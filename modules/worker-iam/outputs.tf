output "group_name" {
  description = "The karrots-worker group."
  value       = aws_iam_group.worker.name
}

output "boundary_arn" {
  description = "The permissions boundary roles created by the worker must carry."
  value       = aws_iam_policy.boundary.arn
}

output "policy_arns" {
  description = "ARN of each worker policy, by name."
  value       = { for name, policy in aws_iam_policy.worker : name => policy.arn }
}

output "user_names" {
  description = "The karrots-worker-<name> users (without access keys)."
  value       = [for user in aws_iam_user.worker : user.name]
}
