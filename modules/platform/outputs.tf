output "vpc_id" {
  description = "ID of the environment's VPC."
  value       = module.network.vpc_id
}

output "private_subnet_ids" {
  description = "IDs of the environment's private subnets."
  value       = module.network.private_subnet_ids
}

output "cluster_endpoint" {
  description = "The EKS API server, or null without a cluster."
  value       = one(module.eks[*].cluster_endpoint)
}

output "kubeconfig" {
  description = "A kubeconfig for the cluster (tokens from `aws eks get-token --profile karrots`), or null."
  value       = one(module.eks[*].kubeconfig)
}

output "repository_url" {
  description = "The ECR repository, or null."
  value       = one(module.ecr[*].repository_url)
}

output "zone_name" {
  description = "The cluster's delegated domain, or null."
  value       = one(module.dns[*].zone_name)
}

output "peering_connection_id" {
  description = "The peering request to accept in the data account, or null."
  value       = one(module.data_peering[*].peering_connection_id)
}

output "state_backend" {
  description = "Bucket and lock table for terraform.backend.s3, or null."
  value       = var.state ? { bucket = module.state[0].bucket, dynamodb_table = module.state[0].lock_table } : null
}
