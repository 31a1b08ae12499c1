variable "name" {
  type        = string
  description = "Name prefix for every resource of the network, usually the cluster name."

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,40}$", var.name))
    error_message = "name must be lowercase letters, digits and '-', at most 41 characters."
  }
}

variable "cidr_block" {
  type        = string
  description = "The VPC's IPv4 range. 10.0.0.0/16 is the seed's default Karrots CIDR; peered networks must not overlap it."
  default     = "10.0.0.0/16"

  validation {
    condition     = can(cidrhost(var.cidr_block, 0)) && tonumber(split("/", var.cidr_block)[1]) <= 20
    error_message = "cidr_block must be an IPv4 CIDR block of /20 or larger."
  }
}

variable "availability_zones" {
  type        = list(string)
  description = "Availability zones to spread subnets across, one private subnet per zone."

  validation {
    condition     = length(var.availability_zones) >= 1 && length(var.availability_zones) <= 6
    error_message = "Give between 1 and 6 availability zones."
  }
}

variable "tags" {
  type        = map(string)
  description = "Tags merged into every resource."
  default     = {}
}

variable "nat_gateway" {
  type        = bool
  description = "Create one NAT gateway so private subnets (EKS nodes) reach the internet. One, not one per zone: a cost the seed's small platform does not need."
  default     = true
}

variable "kms_key_arn" {
  type        = string
  description = "The KMS key that encrypts the flow logs' log group."
}

variable "log_retention_days" {
  type        = number
  description = "Days the flow logs are kept."
  default     = 365
}

variable "permissions_boundary" {
  type        = string
  description = "ARN of the permissions boundary the flow-log delivery role carries (the worker may create roles only with karrots-worker-boundary); null for none."
  default     = null
}

variable "policies_dir" {
  type        = string
  description = "Folder of the IAM policy documents; default: the config repository's policies/."
  default     = null
}
