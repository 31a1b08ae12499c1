variable "name" {
  type        = string
  description = "Cluster name; also the prefix of its IAM roles and node group. Must start with karrots- (the worker policies are scoped to karrots-* names)."

  validation {
    condition     = can(regex("^karrots-[a-z0-9-]{1,32}$", var.name))
    error_message = "name must be karrots- followed by lowercase letters, digits and '-'."
  }
}

variable "kubernetes_version" {
  type        = string
  description = "EKS Kubernetes version."
  default     = "1.31"

  validation {
    condition     = can(regex("^1\\.[0-9]+$", var.kubernetes_version)) && try(tonumber(split(".", var.kubernetes_version)[1]) >= 29, false)
    error_message = "kubernetes_version must look like 1.31, and be 1.29 or later (older versions are out of EKS standard support)."
  }
}

variable "subnet_ids" {
  type        = list(string)
  description = "Private subnets for the control plane's network interfaces and the nodes, in at least two zones."

  validation {
    condition     = length(var.subnet_ids) >= 2
    error_message = "EKS needs subnets in at least two availability zones."
  }
}

variable "node_instance_types" {
  type        = list(string)
  description = "Instance types of the default node group."
  default     = ["t3.large"]
}

variable "node_count" {
  type = object({
    min     = number
    desired = number
    max     = number
  })
  description = "Size of the default node group."
  default     = { min = 1, desired = 2, max = 4 }

  validation {
    condition     = var.node_count.min <= var.node_count.desired && var.node_count.desired <= var.node_count.max
    error_message = "node_count must satisfy min <= desired <= max."
  }
}

variable "aws_profile" {
  type        = string
  description = "aws CLI profile the kubeconfig output uses to get tokens (the seed's karrots profile)."
  default     = "karrots"
}

variable "policies_dir" {
  type        = string
  description = "Folder of the IAM policy documents; default: the config repository's policies/."
  default     = null
}

variable "tags" {
  type        = map(string)
  description = "Tags merged into every resource."
  default     = {}
}

variable "permissions_boundary" {
  type        = string
  description = "ARN of the permissions boundary the cluster and node roles carry (the worker may create roles only with karrots-worker-boundary); null for none."
  default     = null
}

variable "kms_key_arn" {
  type        = string
  description = "The KMS key that encrypts Kubernetes secrets and the control plane's log group."
}

variable "public_access_cidrs" {
  type        = list(string)
  description = "Networks that may reach the API endpoint from the internet. Empty (default): the endpoint is private, reachable from the VPC (and peered networks) only."
  default     = []

  validation {
    condition     = alltrue([for cidr in var.public_access_cidrs : can(cidrhost(cidr, 0)) && cidr != "0.0.0.0/0"])
    error_message = "public_access_cidrs must be IPv4 CIDR blocks, never 0.0.0.0/0: name the networks that may reach the API."
  }
}

variable "control_plane_log_types" {
  type        = list(string)
  description = "Control-plane logs sent to CloudWatch Logs; all five by default."
  default     = ["api", "audit", "authenticator", "controllerManager", "scheduler"]
}

variable "log_retention_days" {
  type        = number
  description = "Days the control plane's logs are kept."
  default     = 365
}
