variable "cluster_name" {
  type        = string
  description = "Name of the environment's cluster; the prefix of every resource name. Must start with karrots- (the worker policies are scoped to karrots-* names)."

  validation {
    condition     = can(regex("^karrots-[a-z0-9-]{1,32}$", var.cluster_name))
    error_message = "cluster_name must be karrots- followed by lowercase letters, digits and '-'."
  }
}

variable "region" {
  type        = string
  description = "AWS region of the environment."

  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]$", var.region))
    error_message = "region must be an AWS region name such as us-east-1."
  }
}

variable "vpc_cidr" {
  type        = string
  description = "The VPC range; the seed's default Karrots CIDR is 10.0.0.0/16."
  default     = "10.0.0.0/16"
}

variable "availability_zones" {
  type        = list(string)
  description = "Availability zones of the region to use, two or more for EKS."
}

variable "nat_gateway" {
  type        = bool
  description = "One NAT gateway for the private subnets."
  default     = true
}

variable "eks" {
  type = object({
    kubernetes_version  = optional(string, "1.31")
    public_access_cidrs = optional(list(string), [])
    node_instance_types = optional(list(string), ["t3.large"])
    node_count          = optional(object({ min = number, desired = number, max = number }), { min = 1, desired = 2, max = 4 })
  })
  description = "The EKS cluster; null for none."
  default     = {}
}

variable "ecr" {
  type        = bool
  description = "A private ECR repository named after the cluster."
  default     = true
}

variable "audit" {
  type        = bool
  description = "A CloudTrail trail and its bucket (once per account)."
  default     = true
}

variable "state" {
  type        = bool
  description = "The S3 bucket and DynamoDB table for remote state (once per account)."
  default     = false
}

variable "dns" {
  type = object({
    account_id     = string
    parent_domain  = string
    parent_zone_id = string
  })
  description = "A zone <cluster_name>.<parent_domain> delegated from the primary zone in account_id; null for none."
  default     = null
}

variable "data_peering" {
  type = object({
    account_id        = string
    vpc_id            = string
    vpc_cidr_block    = string
    route_table_ids   = optional(list(string), [])
    security_group_id = string
    database_port     = optional(number, 5432)
    accepted          = optional(bool, false)
  })
  description = "Peering to the data-warehouse VPC in account_id; null for none."
  default     = null
}

variable "tags" {
  type        = map(string)
  description = "Tags merged into every resource, on top of the karrots:cluster tag."
  default     = {}
}
