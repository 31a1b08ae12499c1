variable "log_group_name" {
  type        = string
  description = "Name of the log group, e.g. /karrots/<cluster>/vpc-flow-logs."
}

variable "role_name" {
  type        = string
  description = "Name of the delivery role; karrots-… so the worker may create it."
}

variable "service" {
  type        = string
  description = "The service principal that delivers, e.g. vpc-flow-logs.amazonaws.com."
}

variable "kms_key_arn" {
  type        = string
  description = "The KMS key that encrypts the log group."
}

variable "retention_days" {
  type        = number
  description = "Days the logs are kept."
}

variable "permissions_boundary" {
  type        = string
  description = "ARN of the permissions boundary the delivery role carries; null for none."
  default     = null
}

variable "policies_dir" {
  type        = string
  description = "Folder of the IAM policy documents; default: the config repository's policies/."
  default     = null
}

variable "tags" {
  type        = map(string)
  description = "Tags of the log group and the role."
  default     = {}
}
