output "vpc_id" {
  description = "ID of the environment's VPC."
  value       = module.network.vpc_id
}

output "private_subnet_ids" {
  description = "IDs of the environment's private subnets."
  value       = module.network.private_subnet_ids
}
