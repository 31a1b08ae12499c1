output "repository_url" {
  description = "URL to push images to."
  value       = aws_ecr_repository.main.repository_url
}

output "repository_arn" {
  description = "ARN of the repository."
  value       = aws_ecr_repository.main.arn
}
